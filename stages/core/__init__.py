"""Stage logic as plain functions over DataFrames, tensors and typed params."""
