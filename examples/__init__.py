"""Examples of bringing your own model (``examples.your_model``, ``examples.bert_classifier``)
and the sweep specs of the published studies. A regular package, so that a distribution that
installs a top-level ``examples`` package (kronfluence 1.0.1 does) cannot shadow it."""
