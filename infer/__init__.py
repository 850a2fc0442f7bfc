"""Stage 3: rank candidates with the exported ONNX model under ONNX Runtime and write Kaggle
submissions. Imports no torch: numpy, scipy, pillow, click, tqdm and onnxruntime-gpu (and the
`tll` package's shared data layer and errors, which need no more) are all a deployment needs.
The model's description (its metadata, written by head.export) is `infer.model_info`."""
