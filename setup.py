"""One distribution: the service (pacifica_like) and its storage backends."""

from setuptools import find_packages, setup

setup(
    name="pacifica-like",
    version="0.1.0",
    description="REST archive gateway for hierarchical storage, wire-compatible with Pacifica",
    python_requires=">=3.11",
    packages=find_packages(include=["pacifica_like", "pacifica_like.*", "backends", "backends.*"]),
    install_requires=["CherryPy>=18.8", "peewee>=3.17"],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "WebTest>=3.0", "requests>=2.31", "ruff>=0.6"],
        "uwsgi": ["uWSGI>=2.0.24"],
        "mysql": ["PyMySQL>=1.1"],
    },
    entry_points={"console_scripts": ["pacifica-like = pacifica_like.cli:main"]},
)
