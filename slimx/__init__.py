"""slimx: compress a trained PyTorch model, compile it for an edge device, and prove the result.

Importing ``slimx`` is cheap: it loads no converter, runtime or model zoo. Each stage is a
subpackage (``slimx.export``, ``slimx.slim``, ``slimx.quant``, ``slimx.targets``,
``slimx.devices``) and heavy SDKs load only when a stage needs them.
"""

__version__ = "0.1.0"
