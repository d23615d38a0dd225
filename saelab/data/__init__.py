"""Notebooks 01-02: texts to tokens to a language model's activations in a store.

    corpus.py      where documents come from: OpenWebText (parquet), a local file, or the offline corpus
    tokens.py      tokenizer, tokenize + pack into contexts, the token dataset on disk (Arrow)
    offline_lm.py  the offline profile's small GPT-2-architecture LM, trained by saelab on its corpus
    lm.py          the language model as a TransformerLens HookedTransformer, one way for every notebook
    capture.py     run the LM over the token contexts and stream one hook's activations to a store

The only stage that touches the language model's weights; what follows reads the store.
"""
