"""Studies that train runs and compare them: `compare`, the semantic-gap and momentum-encoder
experiments, the demo, and the run bookkeeping they share (runs.py)."""
