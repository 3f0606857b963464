"""The paper's harness: what regenerates the figures and claims of Reshniak & Webster
(arXiv:1905.10479) on top of the library core (:mod:`irn`).

- :mod:`~irn.paper.data`, :mod:`~irn.paper.examples`: the examples' data sets and networks;
- :mod:`~irn.paper.training`, :mod:`~irn.paper.experiments`, :mod:`~irn.paper.cache`,
  :mod:`~irn.paper.parallel`: the training loop, jobs and sweeps, the cache of trained models,
  local processes or a Dask cluster;
- :mod:`~irn.paper.robustness`, :mod:`~irn.paper.diagnostics`: measurements of trained
  networks;
- :mod:`~irn.paper.statistics`, :mod:`~irn.paper.claims`: the claims table;
- :mod:`~irn.paper.plotting`, :mod:`~irn.paper.history`: the figures.

These modules need the ``examples`` extra (pandas, matplotlib, ...); the core never imports
them.
"""
