/* homepbx's pjproject configuration (copied to pjlib/include/pj/config_site.h by build.sh).
 *
 * Limits: one media worker hosts several calls; a homepbx call uses up to 4 pjsua calls in
 * its worker (the A leg, the B leg, a join leg, a transfer leg), so 64 pjsua calls serve 16
 * homepbx calls per worker. Every pjsua call holds one conference port, every prompt or
 * beep one player and every answering-machine message one recorder.
 *
 * Features: only what homepbx uses (appliance/media/protocol.py CODECS): G.711 (PCMU, PCMA),
 * G.722, telephone-event, the null audio device, the conference bridge with its resampler,
 * SRTP and TLS (OpenSSL 3). No video, no sound device, no other codec; build.sh passes the
 * matching configure switches, these defines make the choice explicit and checked.
 */

/* --- limits ------------------------------------------------------------------------------ */
#define PJSUA_MAX_CALLS                 64
#define PJSUA_MAX_PLAYERS               128
#define PJSUA_MAX_RECORDERS             64
/* every call, player and recorder on the bridge at once, plus the null device's port 0 */
#define PJSUA_MAX_CONF_PORTS            (PJSUA_MAX_CALLS + PJSUA_MAX_PLAYERS + PJSUA_MAX_RECORDERS + 8)
/* ioqueue handles per ioqueue (the SIP one and the media thread's): RTP + RTCP of every
 * call (128), the SIP transports and listeners; and a closed socket's handle comes back only
 * 500 ms later (PJ_IOQUEUE_KEY_FREE_DELAY), so a worker packed with calls under a burst holds
 * hundreds of them at once: with 256 a burst of 300 calls aborted workers
 * (pj_ioqueue_register_sock2: free_list empty). 1024 is select()'s FD_SETSIZE. */
#define PJ_IOQUEUE_MAX_HANDLES          1024
#define PJSUA_MAX_ACC                   8

/* --- media: audio only, no sound device -------------------------------------------------- */
#define PJMEDIA_HAS_VIDEO               0
#define PJMEDIA_AUDIO_DEV_HAS_NULL_AUDIO 1
#define PJMEDIA_AUDIO_DEV_HAS_ALSA      0
#define PJMEDIA_AUDIO_DEV_HAS_PORTAUDIO 0
#define PJMEDIA_HAS_WEBRTC_AEC          0
#define PJMEDIA_HAS_WEBRTC_AEC3         0

/* no real-time text (T.140, new in 2.16): build.sh makes pjsua's default text stream count
 * this macro, so no call offers or accepts an m=text stream */
#define PJSUA_DEFAULT_TXT_CNT           0

/* --- codecs: G.711, G.722 (and telephone-event, which pjmedia always has) ---------------- */
#define PJMEDIA_HAS_G711_CODEC          1
#define PJMEDIA_HAS_G722_CODEC          1
#define PJMEDIA_HAS_L16_CODEC           0
#define PJMEDIA_HAS_GSM_CODEC           0
#define PJMEDIA_HAS_SPEEX_CODEC         0
#define PJMEDIA_HAS_ILBC_CODEC          0
#define PJMEDIA_HAS_G7221_CODEC         0
#define PJMEDIA_HAS_OPUS_CODEC          0
#define PJMEDIA_HAS_SILK_CODEC          0
#define PJMEDIA_HAS_BCG729              0
#define PJMEDIA_HAS_LYRA_CODEC          0
#define PJMEDIA_HAS_OPENCORE_AMRNB_CODEC 0
#define PJMEDIA_HAS_OPENCORE_AMRWB_CODEC 0
#define PJMEDIA_HAS_INTEL_IPP           0

/* --- security: SRTP (Debian's libsrtp2) and TLS (Debian's OpenSSL 3) --------------------- */
#define PJMEDIA_HAS_SRTP                1
#define PJ_HAS_SSL_SOCK                 1
