"""Stage 2: the light head trained on cached feature maps (`head.model`, `head.loss`,
`python -m head.train`: its config and options in `head.config`, caches and folds in
`head.folds`, validation figures in `head.figures`, run files and summary in `head.report`),
the search of its settings (`python -m head.sweep`), and the export of trunk + head to one ONNX
file (`python -m head.export`)."""
