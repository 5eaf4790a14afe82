"""Built-in data: a dataset whose classes differ only in second-order (channel covariance) statistics."""
from .second_order import SecondOrderDataset, class_correlations

__all__ = ['SecondOrderDataset', 'class_correlations']
