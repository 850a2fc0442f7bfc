from extract.extract_features import cli

cli(prog_name="python -m extract")
