"""The tsptq service: settings, storage, dispatcher and the ``tsptq`` command line."""
