"""`moat app`: a local web page (Gradio) to try a model on your own images.

Gradio is imported only here, when the page is built: `import moat` and every other
command work without it.
"""

from moat.app.page import build_page, launch, serve

__all__ = ["build_page", "launch", "serve"]
