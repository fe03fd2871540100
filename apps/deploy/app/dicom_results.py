"""DICOM results of the microcalcification application, filed in the source study: a Comprehensive 3D SR (TID 1500
measurement report) per ROI and a Secondary Capture of its saliency overlay.

Both copy the source's Patient and General Study modules (DICOM files a result under its study by them: the one place
this application writes patient attributes) and get new Series and SOP Instance UIDs. Nothing else of the source's
header is copied (a malformed source attribute would make the result invalid). The SR follows IHE AI Results
(qualitative findings in a Comprehensive 3D SR with TID 1500 as its root): a measurement group for the ROI with the
probability of malignancy, the operating point (decision threshold) and the call at it as measurements and
qualitative evaluations, the members' disagreement (when known) as a measurement, the algorithm (model name and
version, TID 4019, with the operating point's description as an algorithm parameter), the source image, and the
intended use "research use only, not for clinical use". Concepts without a standard code use the private coding scheme
``99MCC`` (declared in the SR's Coding Scheme Identification Sequence).
"""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

MANUFACTURER = "Research software (MONAI bundle)"
NOT_FOR_CLINICAL_USE = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
SR_SERIES_NUMBER = 9101
SC_SERIES_NUMBER = 9102
SCHEME = "99MCC"
SCHEME_NAME = "Mammographic microcalcification classification (private concepts)"
NO_UNITS = Code("1", "UCUM", "no units")
MAMMOGRAPHY = Code("71651007", "SCT", "Mammography")
DEVICE = Code("121007", "DCM", "Device")
PROBABILITY = Code("MCC001", SCHEME, "Probability of malignancy")
OPERATING_POINT = Code("MCC002", SCHEME, "Decision threshold on probability of malignancy")
CALL = Code("MCC003", SCHEME, "Classification at the decision threshold")
INTENDED_USE = Code("MCC004", SCHEME, "Intended use")
RESEARCH_ONLY = Code("MCC005", SCHEME, "Research use only, not for clinical use")
DISAGREEMENT = Code("MCC006", SCHEME, "Ensemble members' disagreement on probability of malignancy")
CLASS_CODES = {"benign": Code("MCC011", SCHEME, "Benign"), "malignant": Code("MCC012", SCHEME, "Malignant")}

#: Patient module (PS3.3 C.7.1.1) attributes copied from the source when present (Type 2 ones always, maybe empty)
PATIENT_MODULE = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames",
    "EthnicGroup", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "QualityControlSubject",
)  # fmt: skip
#: General Study module (PS3.3 C.7.2.1) attributes copied from the source when present
STUDY_MODULE = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "StudyID", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
)  # fmt: skip
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip
NEEDED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class ResultDicomError(ValueError):
    """The source DICOM lacks what a result filed in its study needs (its UIDs)."""


def read_source(path: str | Path) -> Dataset:
    """The source DICOM's header (no pixel data), with the Type 2 Patient and Study attributes it lacks added empty
    (as a result must have them); :class:`ResultDicomError` when it lacks a UID a result needs."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    missing = [k for k in NEEDED if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise ResultDicomError(f"the source DICOM has no {', '.join(missing)}: no DICOM result can be filed with it")
    for keyword in TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def short_name(name: str, limit: int = 64) -> str:
    """The model's name within a DICOM LO's 64 characters: without a trailing parenthesis, then cut at a word."""
    name = " ".join(name.split())
    if len(name) > limit and name.endswith(")") and " (" in name:
        name = name[: name.rindex(" (")]
    return name if len(name) <= limit else name[:limit].rsplit(" ", 1)[0]


def model_uid(name: str, version: str) -> str:
    """A UID for the model (name, version): the same for every run of one version (the SR's device observer)."""
    return generate_uid(entropy_srcs=[name, version])


def copy_patient_and_study(source: Dataset, ds: Dataset) -> None:
    """Copy the source's Patient and General Study modules into ``ds`` (Type 2 attributes empty when absent)."""
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in PATIENT_MODULE + STUDY_MODULE:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
        elif keyword in TYPE2:
            setattr(ds, keyword, "")


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def build_sr(
    source: Dataset,
    probability: float,
    call: str,
    threshold: float,
    model: dict[str, str],
    roi: str,
    operating_point: str | None = None,
    uncertainty: float | None = None,
) -> Dataset:
    """The Comprehensive 3D SR of one ROI's result (see the module docstring); ``roi`` names the ROI in the report
    (its case id, never a patient attribute), ``operating_point`` describes the decision rule (an algorithm
    parameter: "Operating point: ...") and ``uncertainty`` is the members' disagreement (the standard deviation of
    their probabilities of malignancy; no measurement when ``None``)."""
    name = short_name(model["name"])
    parameters = None if operating_point is None else [f"Operating point: {operating_point}"]
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=model["version"], parameters=parameters)
    observer = hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model_uid(model["name"], model["version"]),
            name=name,
            manufacturer_name=MANUFACTURER,
            model_name=short_name(f"{name} {model['version']}"),
        ),
    )
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=float(probability), unit=NO_UNITS, algorithm_id=algorithm),
        hd.sr.Measurement(name=OPERATING_POINT, value=float(threshold), unit=NO_UNITS),
    ]
    if uncertainty is not None:
        measurements.append(
            hd.sr.Measurement(name=DISAGREEMENT, value=float(uncertainty), unit=NO_UNITS, algorithm_id=algorithm)
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"ROI {roi}"[:64]),
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=CALL, value=CLASS_CODES[call]),
            hd.sr.QualitativeEvaluation(name=INTENDED_USE, value=RESEARCH_ONLY),
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=MAMMOGRAPHY,
        imaging_measurements=[group],
    )
    with warnings.catch_warnings():  # highdicom's warnings quote header values (e.g. the patient's name)
        warnings.simplefilter("ignore")
        sr = hd.sr.Comprehensive3DSR(
            evidence=[source],
            content=report,
            series_instance_uid=generate_uid(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
        )
    sr.SeriesDescription = f"AI result - {NOT_FOR_CLINICAL_USE}"
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = DicomSequence([scheme])
    return sr


def build_overlay_sc(source: Dataset, rgb: np.ndarray, model: dict[str, str], description: str) -> Dataset:
    """A Secondary Capture (RGB, 8 bit) of ``rgb`` (``(H, W, 3)`` uint8, the saliency overlay with its text band)
    in the source's study: its Patient and General Study modules, a new series, a reference to the source image."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    date, time = _now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    copy_patient_and_study(source, ds)
    # SOP Common
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # General Series
    ds.Modality = "OT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = SC_SERIES_NUMBER
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = f"AI saliency - {NOT_FOR_CLINICAL_USE}"
    laterality = str(source.get("Laterality", "") or source.get("ImageLaterality", "") or "")
    ds.Laterality = laterality if laterality in ("R", "L") else ""  # Type 2C: the breast, when the source says
    # General Equipment, SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = short_name(model["name"])
    ds.SecondaryCaptureDeviceSoftwareVersions = model["version"]
    # General Image, SC Image
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = date, time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = description[:1024]
    ds.BurnedInAnnotation = "YES"  # the text band: probability, call, model version, intended use
    ds.LossyImageCompression = "00"
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceImageSequence = DicomSequence([ref])
    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (preamble and file meta) to ``path``, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path
