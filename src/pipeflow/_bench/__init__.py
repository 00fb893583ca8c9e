"""`pipeflow bench`: `bench` runs and measures, `figures` holds the measures.

`render` shows them (tables, files, a chart) and `advice` explains them.
"""
