"""The package version, on its own so that any module can read it without importing the
package (whose lazy names reach the pipeline)."""

__version__ = "0.10.0"
