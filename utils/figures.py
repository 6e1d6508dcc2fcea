"""Matplotlib figures for files and TensorBoard, without pyplot."""


def new_figure(size=None):
    """A figure on the Agg canvas, not registered with pyplot: no display is needed and it
    is freed when no longer referenced."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig
