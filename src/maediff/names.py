"""The data-set names of the protocol, defined once (pDDPM's split files use them):
the tumour set (BraTS21), the MS set (MSLUB) and the healthy set (IXI)."""

TUMOUR = "Brats21"
MS = "MSLUB"
HEALTHY = "IXI"
ANOMALY_SETS = (TUMOUR, MS)  # evaluated with a threshold from their validation split

__all__ = ["ANOMALY_SETS", "HEALTHY", "MS", "TUMOUR"]
