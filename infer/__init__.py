"""Stage 3: rank candidates with the exported ONNX model under ONNX Runtime and write Kaggle
submissions. Imports no torch: numpy, pillow and onnxruntime-gpu are all a deployment needs."""
