"""Notebook 03: train an SAE on a store's activations; the trainer never sees the language model.

    loop.py        `train_sae` and `train_profile`: the one training loop, for every architecture
    step.py        one optimizer step, eager or captured in a CUDA graph
    batching.py    activations -> shuffled minibatches on the training device
    checkpoint.py  resumable checkpoints without pickle
    tracking.py    the local history (CSV) and wandb
    comparison.py  notebook 03's table: every architecture trained on the same store, side by side
"""
