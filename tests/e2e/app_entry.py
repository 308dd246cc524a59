"""Runs the real ``app.py`` for Streamlit's AppTest.

AppTest (Streamlit 1.67) reruns only the page script, not the main script, when the app's
folder has a ``pages/`` directory (it mistakes it for the old pages-folder mode); the shared
sidebar would then never redraw.  Running ``app.py`` from this wrapper, which lives in a
folder without ``pages/``, gives AppTest the same flow as ``streamlit run app.py``:
main script (sidebar, ``st.navigation``) and then the page, on every rerun.
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
