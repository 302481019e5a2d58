"""``python -m bench``: speed against the bare model, the notebook's pipeline and the
machine's limit, plus LSH fidelity and cost, in one run on the same images."""
