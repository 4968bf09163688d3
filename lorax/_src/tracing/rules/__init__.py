"""The rules of the table (`lorax._src.tracing.table`), one module per rule kind: views, products,
control flow. Importing this package registers them; adapter kinds add their product
handlers in `lorax._src.kinds`."""

from lorax._src.tracing.rules import control, products, views  # noqa: F401
