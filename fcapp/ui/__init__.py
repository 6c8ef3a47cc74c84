"""The Gradio app: one module per tab (overview, functions, solve, generate, curate, train, compare) and app.py.

Gradio reads GRADIO_TEMP_DIR when it is imported, so the environment is set here, before any tab
module imports it: analytics off, temporary and uploaded files under the fcapp data folder.
"""

import os

from fcapp.paths import data_home

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["GRADIO_TEMP_DIR"] = str(data_home() / "gradio_tmp")
