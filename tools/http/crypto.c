/*
 * crypto.c - the few cryptographic helpers the front end needs, and the only file that includes
 * libcrypto headers: the WebSocket handshake (SHA-1 + base64, RFC 6455 section 4.2.2), SHA-256
 * of bearer tokens, constant-time comparison and random bytes for request ids.
 */
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "cap.h"
#include "srv_int.h"

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

void srv__ws_accept_key(const char *key, char out[29])
{
    uint8_t md[SHA_DIGEST_LENGTH];
    size_t klen = strlen(key);
    char *buf = cap_malloc(klen + sizeof(ws_guid));
    memcpy(buf, key, klen);
    memcpy(buf + klen, ws_guid, sizeof(ws_guid));
    SHA1((const unsigned char *)buf, klen + sizeof(ws_guid) - 1, md);
    cap_free(buf);
    EVP_EncodeBlock((unsigned char *)out, md, SHA_DIGEST_LENGTH); /* 28 chars + NUL */
}

int srv__ws_key_valid(const char *s)
{
    /* base64 of 16 bytes: 22 significant characters and "==". */
    if (strlen(s) != 24 || s[22] != '=' || s[23] != '=')
        return 0;
    uint8_t raw[24];
    int n = EVP_DecodeBlock(raw, (const unsigned char *)s, 24);
    return n == 18; /* EVP_DecodeBlock counts the padding as zero bytes */
}

void srv__sha256(const void *data, size_t len, uint8_t out[32])
{
    SHA256(data, len, out);
}

int srv__ct_equal(const void *a, const void *b, size_t n)
{
    return CRYPTO_memcmp(a, b, n) == 0;
}

void srv__random(void *buf, size_t n)
{
    if (RAND_bytes(buf, (int)n) != 1)
        cap_fatal("http", "RAND_bytes failed");
}
