"""Notebooks 05-06: does an SAE find the right features, and are they more interpretable than baselines?

    synthetic.py     activations built from known sparse features in superposition (the answer key)
    ground_truth.py  notebook 05's sweep: every architecture trained on synthetic data, scored against the key
    concepts.py      binary token concepts in four strata, a reader can check by eye
    baselines.py     directions to compare with: residual basis, random, PCA, ICA
    probing.py       notebook 06's scores: SAEBench-style k-sparse probing and simulation scoring
    planted.py       a store where notebook 06's answer is known, to prove its scores
    random_twin.py   the same pipeline on the LM at initialisation (features of text, or of the model?)
"""
