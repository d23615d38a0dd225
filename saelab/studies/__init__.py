"""Notebooks 05-06: does an SAE find the right features, and are they more interpretable than baselines?

    synthetic.py     activations built from known sparse features in superposition (the answer key)
    ground_truth.py  notebook 05's sweep: every architecture trained on synthetic data, scored against the key
    concepts.py      binary token concepts a reader can check by eye
    baselines.py     directions to compare with: residual basis, random, PCA, ICA
    probing.py       notebook 06's scores: how well each direction separates each concept
    random_twin.py   the same pipeline on the LM at initialisation (features of text, or of the model?)
"""
