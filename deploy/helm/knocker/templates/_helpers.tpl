{{- define "knocker.labels" -}}
app.kubernetes.io/name: knocker
app.kubernetes.io/component: control-plane
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "knocker.selector" -}}
app.kubernetes.io/name: knocker
app.kubernetes.io/component: control-plane
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "knocker.pod" -}}
metadata:
  labels:
    {{- include "knocker.labels" . | nindent 4 }}
  annotations:
    checksum/config: {{ .Values.config | sha256sum }}
    prometheus.io/scrape: "true"
    prometheus.io/port: "8000"
    prometheus.io/path: /metrics
spec:
  terminationGracePeriodSeconds: 30
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
    seccompProfile: { type: RuntimeDefault }
  containers:
  - name: knocker
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args: [serve]
    ports:
    - { name: http, containerPort: 8000 }
    - { name: grpc, containerPort: 9090 }
    env:
    - { name: KNOCKER_HTTP_ADDR, value: "0.0.0.0:8000" }
    - { name: KNOCKER_GRPC_ADDR, value: "0.0.0.0:9090" }
    - { name: KNOCKER_CONFIG, value: /etc/knocker/knocker.toml }
    {{- if eq .Values.store "nats" }}
    {{- if .Values.nats.urlSecret }}
    - name: KNOCKER_STORE
      valueFrom: { secretKeyRef: { name: {{ .Values.nats.urlSecret | quote }}, key: url } }
    {{- else }}
    - { name: KNOCKER_STORE, value: {{ .Values.nats.url | quote }} }
    {{- end }}
    - { name: KNOCKER_NATS_ACK_WAIT, value: {{ .Values.nats.ackWait | quote }} }
    {{- $history := .Values.nats.maxHistoryBytes }}
    - { name: KNOCKER_MAX_STORE_BYTES, value: {{ if eq (toString $history) "auto" }}"auto"{{ else }}{{ $history | int64 | quote }}{{ end }} }
    {{- if .Values.nats.credsSecret }}
    - { name: KNOCKER_NATS_CREDS, value: /etc/knocker-nats-login/nats.creds }
    {{- end }}
    {{- if .Values.nats.tlsSecret }}
    - { name: KNOCKER_NATS_CA, value: /etc/knocker-nats/ca.crt }
    {{- if .Values.nats.clientCertificate }}
    - { name: KNOCKER_NATS_CERT, value: /etc/knocker-nats/tls.crt }
    - { name: KNOCKER_NATS_KEY, value: /etc/knocker-nats/tls.key }
    {{- end }}
    {{- end }}
    {{- else }}
    - { name: KNOCKER_STORE, value: sqlite }
    - { name: KNOCKER_DATA_DIR, value: /var/lib/knocker }
    - { name: KNOCKER_MAX_STORE_BYTES, value: {{ .Values.persistence.maxStoreBytes | int64 | quote }} }
    {{- end }}
    {{- range $name, $value := .Values.env }}
    - { name: {{ $name }}, value: {{ $value | quote }} }
    {{- end }}
    envFrom:
    - secretRef: { name: {{ .Values.tokensSecret }} }
    readinessProbe:
      httpGet: { path: /knocker/status, port: http }
      periodSeconds: 5
    livenessProbe:
      httpGet: { path: /knocker/status, port: http }
      periodSeconds: 10
      failureThreshold: 6
    resources:
      {{- toYaml .Values.resources | nindent 6 }}
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities: { drop: [ALL] }
    volumeMounts:
    - { name: config, mountPath: /etc/knocker, readOnly: true }
    - { name: tmp, mountPath: /tmp }
    {{- if ne .Values.store "nats" }}
    - { name: data, mountPath: /var/lib/knocker }
    {{- else }}
    {{- if .Values.nats.credsSecret }}
    - { name: nats-login, mountPath: /etc/knocker-nats-login, readOnly: true }
    {{- end }}
    {{- if .Values.nats.tlsSecret }}
    - { name: nats-tls, mountPath: /etc/knocker-nats, readOnly: true }
    {{- end }}
    {{- end }}
  volumes:
  - name: config
    configMap: { name: {{ .Release.Name }}-config }
  - name: tmp
    emptyDir: {}
  {{- if and (eq .Values.store "nats") .Values.nats.credsSecret }}
  - name: nats-login
    secret: { secretName: {{ .Values.nats.credsSecret | quote }} }
  {{- end }}
  {{- if and (eq .Values.store "nats") .Values.nats.tlsSecret }}
  - name: nats-tls
    secret: { secretName: {{ .Values.nats.tlsSecret | quote }} }
  {{- end }}
{{- end }}
