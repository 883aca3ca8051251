"""Packages of the wheel (the metadata is in pyproject.toml). The Alembic migrations and the broker configs live in
the top-level folders migrations/ and broker/ of the checkout and ship inside the wheel as server_api/migrations/
and server_api/broker/ (found by server_api.resources either way)."""

from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup

SHIPPED = {"server_api.migrations": "migrations", "server_api.broker": "broker"}
here = Path(__file__).parent
mapped = {}
for package, folder in SHIPPED.items():
    if not (here / folder).is_dir():  # a partial build context (the edge image copies only its packages)
        continue
    mapped[package] = folder
    for sub in find_namespace_packages(where=str(here / folder)):
        if "__pycache__" not in sub:
            mapped[f"{package}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    packages=find_packages(include=["shared*", "server_api*", "edge_client*"]) + sorted(mapped),
    package_dir=mapped,
    package_data={"shared": ["data/shipped/**/*", "protocol/onnx_templates/*.onnx", "py.typed"], "server_api.api": ["static/*"],
                  **{p: ["*"] for p in mapped}},
)
