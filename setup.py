"""One distribution: the service (pacifica_like), its storage backends and the tape stager's C library."""

import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class CLibrary(Extension):
    """A C shared library that Python binds with ctypes; built like an extension, but no module."""


class BuildExt(build_ext):
    """build_ext that names a :class:`CLibrary` ``lib<name>.so`` and exports no module init.

    The default name carries the interpreter's tag (``.cpython-311-x86_64-linux-gnu.so``),
    which only makes sense for a module ``import`` loads; the ctypes binding looks
    for the plain name beside itself. In editable installs setuptools copies the
    built file into the source tree under this same name.
    """

    def get_ext_filename(self, fullname: str) -> str:
        if isinstance(self.ext_map.get(fullname), CLibrary):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        # No PyInit_<name>: the library's C API is whatever it declares.
        return [] if isinstance(ext, CLibrary) else super().get_export_symbols(ext)


setup(
    name="pacifica-like",
    version="0.1.0",
    description="REST archive gateway for hierarchical storage, wire-compatible with Pacifica",
    python_requires=">=3.11",
    packages=find_packages(include=["pacifica_like", "pacifica_like.*"]),
    ext_modules=[
        CLibrary(
            "pacifica_like.storage.tape.libstager",
            ["pacifica_like/storage/tape/stager.c"],
            # sha-256 through OpenSSL's EVP interface (libssl-dev to build, libssl3 to run).
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
    install_requires=[
        "CherryPy>=18.8",
        # Upper bounds: the versions the test suite ran against (pacifica_like.db uses psycopg 3
        # through peewee 4's PostgresqlDatabase, and driver error codes by their attributes).
        "peewee>=4.5,<5",
        "prometheus_client>=0.20",
        # Bearer tokens (pacifica_like.identity): JWT checks and JWKS keys; [crypto] for RS256/ES256.
        "PyJWT[crypto]>=2.8,<3",
        # The Python client (pacifica_like.client, `pacifica-like client`).
        "requests>=2.31",
        "tqdm>=4.66",
        # The HTTP server of `pacifica-like serve` (pacifica_like/web/httpserver.py); 3.0.1 closed
        # the last request-smuggling holes in its parser.
        "waitress>=3.0.1,<4",
    ],
    extras_require={
        # The database drivers: the catalog tests run the inventory on MariaDB and PostgreSQL.
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "WebTest>=3.0",
            "requests>=2.31",
            "ruff>=0.6",
            "PyMySQL>=1.1,<2",
            # The default MySQL driver where installed (C; builds against libmariadb-dev).
            "mysqlclient>=2.2,<3",
            "psycopg[binary]>=3.1,<4",
            # The bounded, fixed-seed request fuzz (tests/test_fuzz.py).
            "hypothesis>=6.100",
        ],
        "uwsgi": ["uWSGI>=2.0.24"],
        "mysql": ["PyMySQL>=1.1,<2"],
        # mysqlclient: libmariadb's C client, the faster driver (needs libmariadb-dev and pkg-config).
        "mysqlclient": ["mysqlclient>=2.2,<3"],
        "postgres": ["psycopg[binary]>=3.1,<4"],
    },
    entry_points={"console_scripts": ["pacifica-like = pacifica_like.cli.main:main"]},
)
