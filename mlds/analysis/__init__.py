"""Weights as data: baseline analyses of a zoo (``python scripts/analyze.py <zoo> --out <dir>``).

One module per concept:

- :mod:`mlds.zoo.splits` -- the fixed benchmark split (by seed: 50% test / 40% train / 10% val),
  also ``ZooDataset(..., split="train")``;
- :mod:`mlds.analysis.canonical` -- permutation canonicalisation of hidden units (GRU/LSTM gate
  blocks, MLP heads, conv channels) and random hidden permutations, both function-preserving;
- :mod:`mlds.analysis.data` -- a zoo read through :mod:`mlds.zoo.reader` as arrays, one group per
  dataset and architecture;
- :mod:`mlds.analysis.features` -- feature sets: raw weights, per-tensor statistics, canonicalised
  weights, change from the (reproducible) initial weights;
- :mod:`mlds.analysis.probes` -- task identification, backdoor detection, accuracy prediction,
  each with its trivial baseline and a shuffled-label control;
- :mod:`mlds.analysis.figures` -- PNG figures (matplotlib, Agg);
- :mod:`mlds.analysis.report` -- the whole analysis: ``analysis.json``, figures, summary table.

Nothing here is imported by :mod:`mlds.zoo`; importing this package alone imports nothing heavy.
"""
