"""The one thing pyproject.toml cannot say yet: the optional C extension.

``displback.backend._copythreads`` (copy-mode frames on native threads, no GIL) is built
when a compiler and Python's headers are there, and skipped otherwise (``optional=True``):
a Dom0 without them installs the pure-Python copy threads, the same daemon. Everything
else, metadata included, stays in pyproject.toml. (setuptools 74.1 can also read
``[tool.setuptools] ext-modules`` from pyproject.toml, but marks it experimental and subject
to change; this file is the documented, stable way.)
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "displback.backend._copythreads",
            ["displback/backend/_copythreads.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ],
)
