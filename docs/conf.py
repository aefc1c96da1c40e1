"""Sphinx configuration: the user guide, the contract and the API reference, built from
the docstrings of the installed package (``pip install ".[docs]"`` first).

Sphinx with its own napoleon extension reads the NumPy-style sections (Parameters,
Returns, Raises, References, Examples) the docstrings are written in, with no other
dependency; ``sphinx-build -W -b html docs docs/_build/html`` turns every warning into an
error and ``sphinx-build -W -b doctest docs docs/_build/doctest`` runs every example.
"""
import fastdropout

project = "fastdropout"
author = "the fastdropout developers"
copyright = "2026, the fastdropout developers"
release = version = fastdropout.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.doctest", "sphinx.ext.mathjax"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings say the types, in words
autodoc_mock_imports = []
doctest_global_setup = "import numpy as np\nimport fastdropout as fd"
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
