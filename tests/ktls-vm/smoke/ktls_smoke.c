/*
 * ktls_smoke: proves that kernel TLS really works on the running kernel.
 *
 * For every cipher x TLS version it:
 *   wire      - enables kTLS TX on one end of a loopback TCP pair, leaves the
 *               other end plain, and checks that what arrives is exactly one
 *               TLS application-data record of the expected length that does
 *               not contain the plaintext (so the kernel really encrypted);
 *   duplex    - enables TX+RX on both ends (one key per direction, like real
 *               TLS), sends a short message and a 256 KiB buffer (many
 *               16 KiB records) client->server and echoes it back;
 *   bad-key   - TX and RX keys differ by one bit: recv() must fail EBADMSG.
 * and checks that TlsTxSw / TlsRxSw / TlsDecryptError in /proc/net/tls_stat
 * went up accordingly.
 *
 * Build: gcc -O2 -static -o ktls-smoke ktls_smoke.c
 * Usage: ktls-smoke [--optional NAME]...   (NAME as printed, e.g. aes-ccm-128)
 * Exit status 0 only if every required case passed. Prints one line per case
 * and "ktls-smoke: N passed, N failed" at the end.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SOL_TLS
#define SOL_TLS 282
#endif
#ifndef TCP_ULP
#define TCP_ULP 31
#endif

#define BIG_LEN (256 * 1024)
#define IO_TIMEOUT_S 20

struct cipher {
	const char *name;
	uint16_t type;
	size_t iv, key, salt, seq, tag;
	size_t info_len;       /* sizeof the tls12_crypto_info_* struct */
	size_t explicit_nonce; /* bytes of explicit nonce per TLS 1.2 record */
};

static const struct cipher ciphers[] = {
	{"aes-gcm-128", TLS_CIPHER_AES_GCM_128, 8, 16, 4, 8, 16,
	 sizeof(struct tls12_crypto_info_aes_gcm_128), 8},
	{"aes-gcm-256", TLS_CIPHER_AES_GCM_256, 8, 32, 4, 8, 16,
	 sizeof(struct tls12_crypto_info_aes_gcm_256), 8},
	{"chacha20-poly1305", TLS_CIPHER_CHACHA20_POLY1305, 12, 32, 0, 8, 16,
	 sizeof(struct tls12_crypto_info_chacha20_poly1305), 0},
	{"aes-ccm-128", TLS_CIPHER_AES_CCM_128, 8, 16, 4, 8, 16,
	 sizeof(struct tls12_crypto_info_aes_ccm_128), 8},
};

struct version {
	const char *name;
	uint16_t v;
};
static const struct version versions[] = {
	{"tls1.2", TLS_1_2_VERSION},
	{"tls1.3", TLS_1_3_VERSION},
};

static char errbuf[512];
static void fail_msg(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(errbuf, sizeof errbuf, fmt, ap);
	va_end(ap);
}

/* ---- /proc/net/tls_stat ---- */
static long stat_get(const char *name)
{
	FILE *f = fopen("/proc/net/tls_stat", "r");
	char k[64];
	long v, r = -1;
	if (!f)
		return -1;
	while (fscanf(f, "%63s %ld", k, &v) == 2)
		if (!strcmp(k, name))
			r = v;
	fclose(f);
	return r;
}

/* ---- sockets ---- */
static void set_timeouts(int fd)
{
	struct timeval tv = {IO_TIMEOUT_S, 0};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* Connected loopback TCP pair: *c = client end, *s = accepted server end. */
static int tcp_pair(int *c, int *s)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof a;
	int l = socket(AF_INET, SOCK_STREAM, 0);
	if (l < 0 || bind(l, (void *)&a, sizeof a) || listen(l, 1) ||
	    getsockname(l, (void *)&a, &al)) {
		fail_msg("listen on 127.0.0.1: %s", strerror(errno));
		return -1;
	}
	*c = socket(AF_INET, SOCK_STREAM, 0);
	if (*c < 0 || connect(*c, (void *)&a, sizeof a)) {
		fail_msg("connect 127.0.0.1:%d: %s", ntohs(a.sin_port), strerror(errno));
		close(l);
		return -1;
	}
	*s = accept(l, NULL, NULL);
	close(l);
	if (*s < 0) {
		fail_msg("accept: %s", strerror(errno));
		return -1;
	}
	set_timeouts(*c);
	set_timeouts(*s);
	return 0;
}

static int ulp_tls(int fd)
{
	if (setsockopt(fd, IPPROTO_TCP, TCP_ULP, "tls", sizeof "tls")) {
		fail_msg("setsockopt(TCP_ULP, \"tls\"): %s", strerror(errno));
		return -1;
	}
	return 0;
}

/* Fill a crypto_info for cipher c, version v; `seed` varies key/iv/salt. */
static size_t make_info(unsigned char *buf, const struct cipher *c, uint16_t v, unsigned seed)
{
	struct tls_crypto_info *hdr = (void *)buf;
	unsigned char *p = buf + sizeof *hdr;
	size_t i;
	memset(buf, 0, 128);
	hdr->version = v;
	hdr->cipher_type = c->type;
	for (i = 0; i < c->iv; i++)
		*p++ = (unsigned char)(0x10 + i + seed * 7);
	for (i = 0; i < c->key; i++)
		*p++ = (unsigned char)(0x40 + i * 3 + seed * 13);
	for (i = 0; i < c->salt; i++)
		*p++ = (unsigned char)(0xa0 + i + seed);
	for (i = 0; i < c->seq; i++)
		*p++ = 0; /* record sequence starts at 0 */
	if ((size_t)(p - buf) != c->info_len) {
		fprintf(stderr, "internal: %s layout %zu != sizeof %zu\n", c->name,
			(size_t)(p - buf), c->info_len);
		exit(2);
	}
	return c->info_len;
}

static int set_key(int fd, int dir, const struct cipher *c, uint16_t v, unsigned seed, int flip)
{
	unsigned char buf[128];
	size_t len = make_info(buf, c, v, seed);
	if (flip) /* flip one bit of the key */
		buf[sizeof(struct tls_crypto_info) + c->iv] ^= 0x01;
	if (setsockopt(fd, SOL_TLS, dir, buf, len)) {
		fail_msg("setsockopt(SOL_TLS, %s): %s", dir == TLS_TX ? "TLS_TX" : "TLS_RX",
			 strerror(errno));
		return -1;
	}
	return 0;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			fail_msg("send: %s", w < 0 ? strerror(errno) : "returned 0");
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int read_all(int fd, unsigned char *p, size_t n)
{
	while (n) {
		ssize_t r = recv(fd, p, n, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			fail_msg("recv (%zu bytes still expected): %s", n,
				 r < 0 ? strerror(errno) : "EOF");
			return -1;
		}
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

static const char MSG[] = "hello from the kernel TLS smoke test";

/* ---- cases ---- */

/* kTLS TX on client only; server reads the raw record off the wire. */
static int case_wire(const struct cipher *c, const struct version *v)
{
	int cl, sv, rc = -1;
	unsigned char raw[512];
	size_t pt = sizeof MSG - 1, want;
	if (tcp_pair(&cl, &sv))
		return -1;
	if (ulp_tls(cl) || set_key(cl, TLS_TX, c, v->v, 1, 0))
		goto out;
	if (write_all(cl, (const unsigned char *)MSG, pt))
		goto out;
	if (v->v == TLS_1_3_VERSION)
		want = 5 + pt + 1 + c->tag; /* inner content type byte */
	else
		want = 5 + c->explicit_nonce + pt + c->tag;
	if (read_all(sv, raw, want))
		goto out;
	if (raw[0] != 0x17 || raw[1] != 0x03 || raw[2] != 0x03 ||
	    (size_t)((raw[3] << 8) | raw[4]) != want - 5) {
		fail_msg("unexpected record header %02x %02x%02x len %u (want 17 0303 len %zu)",
			 raw[0], raw[1], raw[2], (raw[3] << 8) | raw[4], want - 5);
		goto out;
	}
	if (memmem(raw, want, MSG, 8)) {
		fail_msg("plaintext visible on the wire: not encrypted");
		goto out;
	}
	{ /* nothing more must follow */
		ssize_t r = recv(sv, raw, sizeof raw, MSG_DONTWAIT);
		if (r > 0) {
			fail_msg("%zd unexpected extra bytes after the record", r);
			goto out;
		}
	}
	rc = 0;
out:
	close(cl);
	close(sv);
	return rc;
}

/* TX+RX on both ends, short message + BIG_LEN buffer, echoed back. */
static int case_duplex(const struct cipher *c, const struct version *v)
{
	int cl, sv, rc = -1, st;
	unsigned char *big = malloc(BIG_LEN), *got = malloc(BIG_LEN);
	char small[sizeof MSG];
	size_t i;
	pid_t pid;
	if (!big || !got) {
		fail_msg("out of memory");
		return -1;
	}
	for (i = 0; i < BIG_LEN; i++)
		big[i] = (unsigned char)(i * 131 + (i >> 9));
	if (tcp_pair(&cl, &sv))
		goto out_mem;
	/* client->server key seed 2, server->client key seed 3 */
	if (ulp_tls(cl) || set_key(cl, TLS_TX, c, v->v, 2, 0) || set_key(cl, TLS_RX, c, v->v, 3, 0) ||
	    ulp_tls(sv) || set_key(sv, TLS_RX, c, v->v, 2, 0) || set_key(sv, TLS_TX, c, v->v, 3, 0))
		goto out;
	pid = fork();
	if (pid < 0) {
		fail_msg("fork: %s", strerror(errno));
		goto out;
	}
	if (pid == 0) { /* client: send, then verify the echo */
		close(sv);
		if (write_all(cl, (const unsigned char *)MSG, sizeof MSG) || write_all(cl, big, BIG_LEN))
			goto child_fail;
		memset(got, 0, BIG_LEN);
		if (read_all(cl, (unsigned char *)small, sizeof MSG) || read_all(cl, got, BIG_LEN))
			goto child_fail;
		if (memcmp(small, MSG, sizeof MSG) || memcmp(got, big, BIG_LEN)) {
			fail_msg("echoed data differs from what was sent");
			goto child_fail;
		}
		_exit(0);
	child_fail:
		fprintf(stderr, "    client side: %s\n", errbuf);
		_exit(1);
	}
	/* server: receive and compare, then echo */
	close(cl);
	cl = -1;
	if (read_all(sv, (unsigned char *)small, sizeof MSG) || read_all(sv, got, BIG_LEN)) {
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
		goto out;
	}
	if (memcmp(small, MSG, sizeof MSG) || memcmp(got, big, BIG_LEN)) {
		fail_msg("server received data that differs from what was sent");
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
		goto out;
	}
	if (write_all(sv, (unsigned char *)small, sizeof MSG) || write_all(sv, got, BIG_LEN)) {
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
		goto out;
	}
	if (waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) {
		fail_msg("client side failed (status 0x%x)", st);
		goto out;
	}
	rc = 0;
out:
	if (cl >= 0)
		close(cl);
	close(sv);
out_mem:
	free(big);
	free(got);
	return rc;
}

/* Key mismatch: the receiver must reject the record with EBADMSG. */
static int case_badkey(const struct cipher *c, const struct version *v)
{
	int cl, sv, rc = -1;
	char buf[256];
	ssize_t r;
	if (tcp_pair(&cl, &sv))
		return -1;
	if (ulp_tls(cl) || set_key(cl, TLS_TX, c, v->v, 4, 0) || ulp_tls(sv) ||
	    set_key(sv, TLS_RX, c, v->v, 4, 1))
		goto out;
	if (write_all(cl, (const unsigned char *)MSG, sizeof MSG))
		goto out;
	r = recv(sv, buf, sizeof buf, 0);
	if (r >= 0) {
		fail_msg("recv with the wrong key returned %zd bytes instead of failing", r);
		goto out;
	}
	if (errno != EBADMSG) {
		fail_msg("recv with the wrong key failed with %s, want EBADMSG", strerror(errno));
		goto out;
	}
	rc = 0;
out:
	close(cl);
	close(sv);
	return rc;
}

int main(int argc, char **argv)
{
	int passed = 0, failed = 0, optional_failed = 0;
	size_t ci, vi;
	long tx0, rx0, de0;
	const char *optional[16];
	int nopt = 0, i;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--optional") && i + 1 < argc && nopt < 16)
			optional[nopt++] = argv[++i];
		else {
			fprintf(stderr, "usage: %s [--optional CIPHER]...\n", argv[0]);
			return 2;
		}
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	alarm(240); /* hard bound on the whole run */

	tx0 = stat_get("TlsTxSw");
	rx0 = stat_get("TlsRxSw");
	de0 = stat_get("TlsDecryptError");
	if (tx0 < 0 || rx0 < 0) {
		printf("FAIL /proc/net/tls_stat missing or without TlsTxSw/TlsRxSw (is tls.ko loaded?)\n");
		printf("ktls-smoke: 0 passed, 1 failed\n");
		return 1;
	}

	for (ci = 0; ci < sizeof ciphers / sizeof *ciphers; ci++) {
		const struct cipher *c = &ciphers[ci];
		int opt = 0;
		for (i = 0; i < nopt; i++)
			opt |= !strcmp(optional[i], c->name);
		for (vi = 0; vi < sizeof versions / sizeof *versions; vi++) {
			const struct version *v = &versions[vi];
			static const char *names[] = {"wire", "duplex", "bad-key"};
			int (*fns[])(const struct cipher *, const struct version *) = {
				case_wire, case_duplex, case_badkey};
			int k;
			for (k = 0; k < 3; k++) {
				errbuf[0] = 0;
				if (fns[k](c, v) == 0) {
					passed++;
					printf("PASS %-18s %-6s %-8s\n", c->name, v->name, names[k]);
				} else if (opt) {
					optional_failed++;
					printf("FAIL %-18s %-6s %-8s (optional) %s\n", c->name, v->name,
					       names[k], errbuf);
				} else {
					failed++;
					printf("FAIL %-18s %-6s %-8s %s\n", c->name, v->name, names[k],
					       errbuf);
				}
			}
		}
	}

	{
		long tx = stat_get("TlsTxSw"), rx = stat_get("TlsRxSw"), de = stat_get("TlsDecryptError");
		/* every passing wire/duplex/bad-key case set TX at least once; duplex and
		 * bad-key set RX; every passing bad-key case is a decrypt error. */
		printf("tls_stat: TlsTxSw %ld -> %ld, TlsRxSw %ld -> %ld, TlsDecryptError %ld -> %ld\n",
		       tx0, tx, rx0, rx, de0, de);
		if (tx - tx0 <= 0 || rx - rx0 <= 0) {
			failed++;
			printf("FAIL tls_stat counters TlsTxSw/TlsRxSw did not go up\n");
		} else {
			passed++;
			printf("PASS tls_stat counters TlsTxSw +%ld, TlsRxSw +%ld\n", tx - tx0, rx - rx0);
		}
		if (de >= 0 && de - de0 <= 0) {
			failed++;
			printf("FAIL tls_stat TlsDecryptError did not go up after the bad-key cases\n");
		} else if (de >= 0) {
			passed++;
			printf("PASS tls_stat TlsDecryptError +%ld (bad-key cases)\n", de - de0);
		}
	}
	if (optional_failed)
		printf("note: %d optional case(s) failed (not counted)\n", optional_failed);
	printf("ktls-smoke: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
