"""Stage functions of the example pipelines in `configs/`: plain Python, no pipeflow import."""
