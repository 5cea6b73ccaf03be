"""FIR filter taps shared by the ADA pipeline and the op checks (one home, no import of training)."""

# Symlet scaling filters, orthonormal (sum sqrt(2), autocorrelation zero at every non-zero even lag). ADA (Karras et
# al. 2020, app. B) low-passes around the geometric resampling with sym6 and builds the image-space filter bank from
# sym2.
SYM2 = [-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025]
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]
