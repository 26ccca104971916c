"""Downstream agreement: what a downstream model sees in SR compared with what it sees in HR (or the map).

`rvsa` / `uperhead` / `checkpoints`: the RVSA scene classifier and LoveDA segmenter of SGDM section 6.4 and
their official-file loaders; `agreement`: the agreement metrics as pure functions; `mapseg`: the small map
segmenter trained on the dataset's own HR/mask pairs, for map agreement.
"""
