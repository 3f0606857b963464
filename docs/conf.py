"""Sphinx configuration of irn's API reference (``make docs`` builds it into docs/_build)."""

project = "irn"
author = "irn contributors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
exclude_patterns = ["_build", "*.md"]  # design.md and the moved README sections stay Markdown
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
nitpicky = False
