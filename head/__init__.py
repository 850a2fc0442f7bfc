"""Stage 2: the light head trained on cached feature maps (`head.model`, `head.loss`,
`python -m head.train`), and the export of trunk + head to one ONNX file
(`python -m head.export`)."""
