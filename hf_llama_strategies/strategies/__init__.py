"""Built-in strategies, one module each, registered as plugins like any third-party one."""
