from infer.predict import cli

cli(prog_name="python -m infer")
