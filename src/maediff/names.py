"""The data-set names of the protocol, defined once (pDDPM's split files use them):
the tumour set (BraTS21), the MS set (MSLUB) and the healthy set (IXI).

The names are the keys of summaries and the folder names of pDDPM's layout ("Brats21"
on disk); tables and text show each set in one spelling (`shown_name`: "BraTS21"), and
the command line takes either (`protocol_name`)."""

TUMOUR = "Brats21"
MS = "MSLUB"
HEALTHY = "IXI"
ANOMALY_SETS = (TUMOUR, MS)  # evaluated with a threshold from their validation split
# the benchmark's Figure 3: how many test volumes of each set it shows
FIGURE_SUBJECTS = ((TUMOUR, 2), (MS, 1))

_SHOWN = {TUMOUR: "BraTS21"}  # the challenge's own spelling


def shown_name(dataset: str) -> str:
    """How tables and text spell a data set: "Brats21" -> "BraTS21"; others unchanged."""
    return _SHOWN.get(dataset, dataset)


def protocol_name(name: str) -> str:
    """The protocol's name of a data set given in any case ("BraTS21", "brats21" ->
    "Brats21"); any other name (a BIDS data set's) unchanged."""
    return {n.lower(): n for n in (*ANOMALY_SETS, HEALTHY)}.get(name.lower(), name)


__all__ = [
    "ANOMALY_SETS",
    "FIGURE_SUBJECTS",
    "HEALTHY",
    "MS",
    "TUMOUR",
    "protocol_name",
    "shown_name",
]
