"""Write small synthetic DICOM images (for tests, demos and checking a pipeline without real data).

Only synthetic content is written: the patient module is filled with placeholders unless given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DSequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: Sequence[int] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    imager_pixel_spacing: tuple[float, float] | None = None,
    transfer_syntax: str | None = None,
    patient_name: str = "ANON",
    patient_id: str = "ANON",
    signed: bool = False,
) -> Path:
    """Write ``pixels`` (``(H, W)`` integer stored values) as a single-frame grayscale DICOM file.

    ``transfer_syntax`` other than explicit VR little endian stores ``pixels``' bytes encapsulated as is
    (not a valid codestream): enough to test a missing-decoder error, not to decode.
    """
    pixels = np.asarray(pixels)
    bits_allocated = 8 if pixels.dtype.itemsize == 1 else 16
    pixels = pixels.astype((np.int16 if signed else np.uint16) if bits_allocated == 16 else np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyDate = "20000101"
    ds.Modality = "MG"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None or intercept is not None:
        ds.RescaleSlope = slope if slope is not None else 1.0
        ds.RescaleIntercept = intercept if intercept is not None else 0.0
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUTData
        ds.VOILUTSequence = DSequence([item])
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [float(imager_pixel_spacing[0]), float(imager_pixel_spacing[1])]
    if transfer_syntax and meta.TransferSyntaxUID.is_compressed:
        ds.PixelData = encapsulate([pixels.tobytes()])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
