"""The registered model's code, logged as MLflow "models from code".

`flam register` logs this file as the pyfunc's `python_model`; MLflow runs it when it logs and
whenever it loads the model (`mlflow models serve`, `mlflow.pyfunc.load_model`), and takes the
model that `set_model` names. The registered model therefore stores source code, never a
pickled Python object. The library does not import this module.
"""

import mlflow

from flam_core.pyfunc import FlamPyfunc

mlflow.models.set_model(FlamPyfunc())
