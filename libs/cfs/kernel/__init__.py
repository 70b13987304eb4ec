"""The service kernel: a service is a declared `ServiceSpec` (`cfs.kernel.spec`) plus
pure decide/apply code; one runtime (`cfs.kernel.runtime`) runs any spec, and every list
of services is derived from the specs (`cfs.kernel.registry`). See README "Adding a
service"."""
