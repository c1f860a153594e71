"""Cache-affine replica choice: Serve RequestRouter subclasses (session.py, prefix.py) named in the deployment plan.

Serve imports the routers by path in every process that routes to a model; `keys` and `table` are the pure parts
(no Ray), so this package's `__init__` imports nothing.
"""

__all__: list[str] = []
