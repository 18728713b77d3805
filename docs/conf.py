"""Sphinx configuration: Markdown pages (MyST) and the API reference from the docstrings (autodoc,
napoleon). Built in CI with warnings as errors: sphinx-build -W -b html docs docs/_build/html."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
import hessext  # noqa: E402

project = "hessext"
author = "hessext developers"
release = version = hessext.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
html_theme = "alabaster"
html_theme_options = {"description": "Fast, exact second-order derivatives for PyTorch"}
