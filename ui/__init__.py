"""MAE Studio's web UI: one module per tab (:mod:`ui.train`, :mod:`ui.reconstruct`,
:mod:`ui.parameters`, :mod:`ui.runs`), composed into one page by :mod:`ui.blocks`; the command line
that launches it is :mod:`ui.launch`.

Importing the package imports nothing: ``python app.py --help``, or one refused for a port in use,
answers before gradio is loaded (six seconds on a 2-core machine).
"""
