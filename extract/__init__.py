"""Stage 1: the frozen trunks (`backbones`, and their description as data, torch-free:
`trunk_spec`), the feature cache (`cache`, the only module that touches h5py), extraction on one
process or under torchrun (`extract_features`, `torchrun`) and the synthetic look-alike set
(`synth`). What every stage shares (the logger, errors, files, the Kaggle data layer) is in
`tll`."""
