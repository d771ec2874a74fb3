"""Protocol constants (docs/PROTOCOL.md §2).  Changing any of these changes the wire format."""

from __future__ import annotations

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

# --- link packets (first byte; 0x00/0x01 are left to STUN and the DHT for demultiplexing) ---
MSG_INIT_CLIENT = 0x51  # Noise NK initiation from an anonymous client
MSG_INIT_RELAY = 0x52  # Noise IK initiation from an authenticated relay
MSG_RESPONSE = 0x53  # Noise handshake response (both patterns)
MSG_TRANSPORT = 0x54  # one encrypted cell
MSG_COOKIE_REPLY = 0x59  # a responder under load: retry with mac2 (§4.12); 0x55..0x58 are NAT frames

LINK_HEADER_LEN = 13  # type u8 | receiver index u32 | counter u64
TAG_LEN = 16
MAC_LEN = 16

# --- cells (fixed size at every hop) ---
CELL_LEN = 1400
CIRC_ID_LEN = 4
CELL_HEADER_LEN = CIRC_ID_LEN + 1  # circ id u32 | command u8
RELAY_LEN = CELL_LEN - CELL_HEADER_LEN  # 1395: a RELAY cell's payload, the region every onion layer covers
LINK_PACKET_LEN = LINK_HEADER_LEN + CELL_LEN + TAG_LEN  # 1429 bytes of UDP payload

# --- onion layers (§6.4): each hop's forward layer is AES-256-GCM with an 8-byte sequence field and a
# 16-byte tag in front; the hop strips them and appends zeros, so the region always keeps RELAY_LEN bytes ---
HOP_SEQ_LEN = 8
HOP_SLOT_LEN = HOP_SEQ_LEN + TAG_LEN  # 24
HOP_WINDOW = 64  # a forwarding hop's per-direction window: older or repeated cells tear the circuit down
MAX_HOPS = 4
INNER_LEN = RELAY_LEN - MAX_HOPS * HOP_SLOT_LEN  # 1299: end-to-end message space, whatever the path length
MSG_HEADER_LEN = 3  # type u8 | length u16
MAX_DATA_LEN = INNER_LEN - MSG_HEADER_LEN  # 1296 (>= 1280, the IPv6 minimum MTU)

# --- circuit build ---
N_SLOTS = MAX_HOPS  # build records per CREATE; always this many, whatever the path length
ONION_KEY_ID_LEN = 4
RECORD_PAYLOAD_LEN = 96
RECORD_LEN = ONION_KEY_ID_LEN + 32 + RECORD_PAYLOAD_LEN + TAG_LEN  # 148
REPLY_LEN = 32 + 16  # Y | auth
CREATE_SLOTS_LEN = N_SLOTS * RECORD_LEN  # 592 of the payload; the rest is zero
CREATED_SLOTS_LEN = N_SLOTS * REPLY_LEN  # 192

# --- labels (all HKDF/MAC domain separation strings live here) ---
LABEL_PROLOGUE = b"shallot-link-v1"
LABEL_MAC1 = b"shallot-v1 mac1"
LABEL_COOKIE = b"shallot-v1 cookie"
LABEL_LINK_CERT = b"shallot-v1 link-cert"
LABEL_RESUME = b"shallot-v1 link-resume"
LABEL_DESCRIPTOR = b"shallot-v1 descriptor\x00"
LABEL_RECORD = b"shallot-v1 build-record"
LABEL_LAYER = b"shallot-v1 build-layer"
LABEL_CIRCUIT = b"shallot-v1 circuit-keys"
LABEL_CREATED = b"shallot-v1 created"
LABEL_ONION_KEY_ID = b"shallot-v1 onion-key-id"
LABEL_RELAY_ID = b"shallot-v1 relay-id"
LABEL_DHT_ANSWER = b"shallot-v1 dht-answer\x00"  # DHT answers signed by the relay identity (§12.3)
# protocol id bound into the circuit-key derivation and the hop's auth tag (ntor's PROTOID, review L1)
PROTOID_BUILD = b"shallot-v1 build x25519-sha256"
LABEL_HOP_LAYER = b"shallot-v1 hop-layer"  # per-hop onion-layer keys from fwd_body || bwd_body (§6.4)

# --- timers and limits (seconds unless named otherwise) ---
REKEY_AFTER_S = 120.0
REJECT_AFTER_S = 180.0
KEEPALIVE_S = 10.0
LINK_DEAD_AFTER_S = 30.0
HANDSHAKE_RETRY_S = 0.5
HANDSHAKE_ATTEMPTS = 6
COOKIE_SECRET_S = 120.0  # a responder's cookie secret is replaced this often; an initiator uses a cookie this long
HALF_OPEN_S = 10.0  # a responder forgets an answered handshake for a new link without a transport packet by then
HANDSHAKE_SKEW_S = 120.0  # relay (IK) initiation timestamps must be this close to our clock; clients send none
REPLAY_WINDOW = 2048
REKEY_AFTER_MESSAGES = 1 << 60
RECORD_EPOCH_S = 3600  # build records carry the client's hour (floor(wall / 3600)), nothing finer
RECORD_SLACK_S = 600  # a record of hour h is accepted while now is in [h*3600 - slack, (h+1)*3600 + slack]
CIRCUIT_IDLE_S = 300.0
CREATE_TIMEOUT_S = 10.0
DESCRIPTOR_LIFETIME_S = 86400  # matches the onion key period: a descriptor never outlives its key's overlap
ONION_KEY_ROTATE_S = 86400  # onion keys protect routing metadata of recorded builds: keep them short-lived
ONION_KEY_OVERLAP_S = 86400
