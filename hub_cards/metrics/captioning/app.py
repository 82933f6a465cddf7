import evaluate
from evaluate.utils import launch_gradio_widget

from srd_hf.metrics import metric_path

module = evaluate.load(metric_path("captioning"))
launch_gradio_widget(module)
