"""Built-in model adapters, registered through the ``tokenreduce_register_adapters`` hook."""
