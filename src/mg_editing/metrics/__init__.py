"""``evaluate`` metric modules shipped with the package.

``evaluate.load(FB_SCORE_PATH)`` works from anywhere once mg-editing is installed.

Example:
    >>> import evaluate
    >>> from mg_editing.metrics import FB_SCORE_PATH
    >>> fb = evaluate.load(FB_SCORE_PATH)
    >>> round(fb.compute(p_he=[0.5], p_she=[0.1], fscore=[0.0])["fb_score"], 4)
    0.4
"""

from pathlib import Path

#: Directory of the FB-Score metric module (``fb_score.py`` + its README card).
FB_SCORE_PATH: str = str(Path(__file__).resolve().parent / "fb_score")
